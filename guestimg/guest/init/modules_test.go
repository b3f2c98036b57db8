package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"govmm/guestimg/internal/guestproto"
)

// A module is loaded when the line names no device or one the machine has.
func TestWantModule(t *testing.T) {
	t.Parallel()
	net := map[string]bool{guestproto.NeedVirtioNet: true, guestproto.NeedVirtioBlk: false}
	none := map[string]bool{}
	tests := []struct {
		line string
		has  map[string]bool
		want bool
	}{
		{"/lib/modules/v/virtio.ko virtio-blk virtio-net", net, true},
		{"/lib/modules/v/virtio.ko virtio-blk virtio-net", none, false},
		{"/lib/modules/v/ext4.ko virtio-blk", net, false},
		{"/lib/modules/v/virtio_net.ko virtio-net", net, true},
		{"/lib/modules/v/always.ko", none, true}, // no device named: always
		{"", net, false},
		{"   ", net, false},
	}
	for _, tt := range tests {
		p, ok := wantModule(tt.line, tt.has)
		assert.Equal(t, tt.want, ok, "%q", tt.line)
		if tt.want {
			assert.Equal(t, strings.Fields(tt.line)[0], p)
		}
	}
}
