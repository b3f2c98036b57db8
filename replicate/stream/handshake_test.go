package stream

import (
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHandshake(t *testing.T) {
	tests := []struct {
		name     string
		insecure bool
		rcvID    Identity
	}{
		{"keyed, identity checked", false, testIdentity()},
		{"keyed, receiver accepts any vm", false, Identity{}},
		{"insecure loopback", true, testIdentity()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			rcfg.Identity = tt.rcvID
			if tt.insecure {
				scfg.Key, scfg.Insecure = nil, true
				rcfg.Key, rcfg.Insecure = nil, true
			}
			s, r := pipePair(t, scfg, rcfg)
			assert.Equal(t, testIdentity(), r.Peer())
			assert.Equal(t, tt.rcvID, s.Peer())
			assert.NoError(t, s.Err())
			assert.NoError(t, r.Err())
		})
	}
}

// witnessed is id as a primary that holds generation 7 at a witness
// announces it.
func witnessed(id Identity) Identity {
	id.Generation, id.Holder = 7, "primary host-a #0123456789abcdef"
	return id
}

// The sender's witness generation and holder name reach the receiver
// (whose standby claims the next generation from it); a receiver that
// expects a VM does not compare them.
func TestHandshakeCarriesGeneration(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Identity = witnessed(testIdentity())
	rcfg.Identity = testIdentity()
	s, r := pipePair(t, scfg, rcfg)
	assert.Equal(t, uint64(7), r.Peer().Generation)
	assert.Equal(t, "primary host-a #0123456789abcdef", r.Peer().Holder)
	assert.Equal(t, scfg.Identity, r.Peer())
	assert.NoError(t, s.Err())

	// A holder without a generation describes no witness: refused.
	bad := testIdentity()
	bad.Holder = "primary"
	require.ErrorIs(t, bad.Validate(), ErrFrame)
	bad.Generation, bad.Holder = 1, strings.Repeat("h", MaxHolderLen+1)
	require.ErrorIs(t, bad.Validate(), ErrFrame)
}

func TestHandshakeRefusals(t *testing.T) {
	otherKey := []byte("fedcba9876543210fedcba9876543210")
	bigger := testIdentity()
	bigger.Regions = []Region{{GPA: 0, Size: 8 << 20}}
	tests := []struct {
		name      string
		edit      func(s, r *Config)
		senderErr error
		rcvErr    error
		mention   string
	}{
		{"wrong key", func(s, r *Config) { s.Key = otherKey }, ErrAuth, ErrAuth, "proof"},
		{"receiver has the wrong key", func(s, r *Config) { r.Key = otherKey }, ErrAuth, ErrAuth, "proof"},
		{"no key to a keyed listener", func(s, r *Config) { s.Key, s.Insecure = nil, true }, ErrAuth, ErrAuth, "no key"},
		{"keyed sender to an unkeyed receiver", func(s, r *Config) { r.Key, r.Insecure = nil, true }, ErrAuth, ErrAuth, "key"},
		{"mismatched layout", func(s, r *Config) { r.Identity = bigger }, ErrMismatch, ErrMismatch, "memory layout [0x0+0x800000]"},
		{"mismatched name", func(s, r *Config) { r.Identity.Name = "vm1" }, ErrMismatch, ErrMismatch, `"vm1"`},
		{"missing device", func(s, r *Config) { r.Identity.Devices = r.Identity.Devices[:1] }, ErrMismatch, ErrMismatch,
			"device virtio-net0 on the peer is missing here"},
		{"other disk size", func(s, r *Config) {
			r.Identity.Devices = slices.Clone(r.Identity.Devices)
			r.Identity.Devices[2] = Device{ID: "virtio-blk0", Attrs: []Attr{{"kind", "virtio-blk"}, {"size", "2097152"}, {"ro", "false"}}}
		}, ErrMismatch, ErrMismatch, `device virtio-blk0: size "2097152" here, "1048576" on the peer`},
		{"verify fails for a reason of its own", func(s, r *Config) {
			r.Verify = func(Identity) error { return errors.New("tap0: device busy") }
		}, ErrRefused, ErrRefused, "tap0: device busy"},
		{"verify refuses", func(s, r *Config) {
			r.Verify = func(Identity) error { return fmt.Errorf("%w: no such MAC here", ErrMismatch) }
		}, ErrMismatch, ErrMismatch, "no such MAC here"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			tt.edit(&scfg, &rcfg)
			a, b := net.Pipe()
			s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
			assert.Nil(t, s)
			assert.Nil(t, r)
			require.ErrorIs(t, serr, tt.senderErr)
			require.ErrorIs(t, rerr, tt.rcvErr)
			var se *StreamError
			require.ErrorAs(t, rerr, &se)
			assert.Contains(t, rerr.Error(), tt.mention)
			t.Logf("sender: %v", serr)
			t.Logf("receiver: %v", rerr)
		})
	}
}

// TestVersionRefused: a peer of an older (1: HMAC-framed session; the
// previous one, 5, whose Pages frames have no codec header) or newer
// version is refused at its hello with ErrVersion, which the handshake
// framing (unchanged since version 1) makes readable across versions.
func TestVersionRefused(t *testing.T) {
	for _, v := range []uint16{1, Version - 1, Version + 1} {
		t.Run(fmt.Sprintf("version %d", v), func(t *testing.T) {
			_, rcfg := cfgs(newFakeClock())
			a, b := net.Pipe()
			done := make(chan error, 1)
			go func() {
				_, err := NewReceiver(t.Context(), b, rcfg)
				done <- err
			}()
			h := hello{version: v, keyed: true, role: roleSender, id: testIdentity()}
			var ctr counters
			w := newFrameWriter(a, &ctr)
			require.NoError(t, w.write(frameHello, appendHello(nil, &h)))
			go func() {
				_ = w.flush()
				_, _ = io.Copy(io.Discard, a) // the receiver's error frame
			}()
			err := <-done
			require.ErrorIs(t, err, ErrVersion)
			assert.Contains(t, err.Error(), fmt.Sprintf("version %d", v))
			a.Close()
		})
	}
}
