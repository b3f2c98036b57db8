package stream

import (
	"bytes"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/replicate/internal/aegis"
)

// TestCipherNegotiation: the two hellos pick the session's cipher, both
// ends agree on it, a checkpoint crosses under it and arrives whole, and
// no page travels in the clear; an end that requires an AEGIS refuses
// a peer that will not seal with it, and both ends say why.
func TestCipherNegotiation(t *testing.T) {
	if !aegis.SupportedX2() {
		t.Fatalf("this CPU cannot run AEGIS-128X2 (%v): every host of this project's CI can", aegis.ErrUnsupportedX2)
	}
	for _, tt := range []struct {
		sender, receiver Cipher
		want             string // "": refused, by the end that requires a cipher
	}{
		{CipherAuto, CipherAuto, "aegis-128x2"},
		{CipherAEGISX2, CipherAuto, "aegis-128x2"},
		{CipherAuto, CipherAEGISX2, "aegis-128x2"},
		{CipherAEGIS, CipherAuto, "aegis-128l"},
		{CipherAuto, CipherAEGIS, "aegis-128l"},
		{CipherAuto, CipherAESGCM, "aes-256-gcm"},
		{CipherAESGCM, CipherAuto, "aes-256-gcm"},
		{CipherAESGCM, CipherAESGCM, "aes-256-gcm"},
		{CipherAEGIS, CipherAESGCM, ""},
		{CipherAESGCM, CipherAEGIS, ""},
		{CipherAEGISX2, CipherAESGCM, ""},
		{CipherAEGISX2, CipherAEGIS, ""},
		{CipherAEGIS, CipherAEGISX2, ""},
	} {
		t.Run(fmt.Sprintf("%v to %v", tt.sender, tt.receiver), func(t *testing.T) {
			var (
				mu   sync.Mutex
				wire []byte
			)
			sc, rc := proxy(t, func(_ int, f []byte) [][]byte {
				mu.Lock()
				wire = append(wire, f...)
				mu.Unlock()
				return [][]byte{f}
			})
			scfg, rcfg := cfgs(newFakeClock())
			scfg.Cipher, rcfg.Cipher = tt.sender, tt.receiver
			sink := NewMemSink()
			rcfg.Sink = sink
			s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
			if tt.want == "" {
				require.ErrorIs(t, serr, ErrAuth)
				require.ErrorIs(t, rerr, ErrAuth)
				refuser, required := rerr, tt.receiver
				if tt.sender != CipherAESGCM {
					refuser, required = serr, tt.sender
				}
				assert.Contains(t, refuser.Error(), "this end requires it")
				assert.Contains(t, refuser.Error(), required.String())
				return
			}
			require.NoError(t, serr)
			require.NoError(t, rerr)
			assert.Equal(t, tt.want, s.Cipher())
			assert.Equal(t, tt.want, r.Cipher())
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 300, []byte("state")))
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1))
			for i := range 300 {
				want := page(1000 + uint64(i))
				if i%3 == 2 {
					want = make([]byte, PageSize)
				}
				require.Equal(t, want, sink.Page(GPA(i*PageSize)), "page %d", i)
			}
			mu.Lock()
			for _, i := range []int{0, 1, 150, 298} {
				assert.False(t, bytes.Contains(wire, page(1000 + uint64(i))[:64]), "page %d crossed in the clear", i)
			}
			mu.Unlock()
			s.Close()
			_ = waitErr(t, run)
		})
	}

	t.Run("unkeyed", func(t *testing.T) {
		scfg, rcfg := cfgs(newFakeClock())
		scfg.Key, scfg.Insecure = nil, true
		rcfg.Key, rcfg.Insecure = nil, true
		a, b := net.Pipe()
		s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
		require.NoError(t, serr)
		require.NoError(t, rerr)
		assert.Equal(t, "none", s.Cipher())
		assert.Equal(t, "none", r.Cipher())
	})
}

func TestParseCipher(t *testing.T) {
	for _, c := range []Cipher{CipherAuto, CipherAESGCM, CipherAEGIS, CipherAEGISX2} {
		got, err := ParseCipher(c.String())
		require.NoError(t, err)
		assert.Equal(t, c, got)
	}
	_, err := ParseCipher("chacha20")
	require.ErrorIs(t, err, ErrConfig)
	_, err = Config{Key: testKey, Cipher: CipherAEGISX2 + 1}.withDefaults()
	require.ErrorIs(t, err, ErrConfig)
}
