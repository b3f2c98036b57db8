package stream

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestListenDialTCP(t *testing.T) {
	_, err := Listen("0.0.0.0:0", Config{Insecure: true})
	require.ErrorIs(t, err, ErrInsecureListen)
	_, err = Listen("127.0.0.1:0", Config{})
	require.ErrorIs(t, err, ErrConfig, "no key and not insecure")
	_, err = Listen("127.0.0.1:0", Config{Insecure: true, HeartbeatInterval: 1 << 62, FailoverTimeout: time.Second})
	require.ErrorIs(t, err, ErrConfig, "a heartbeat whose double wraps negative is still longer than half the timeout")

	scfg, rcfg := cfgs(nil)
	scfg.Clock, rcfg.Clock = nil, nil
	refused := make(chan error, 16)
	rcfg.OnRefused = func(err error) { refused <- err }
	ln, err := Listen("127.0.0.1:0", rcfg)
	require.NoError(t, err)
	defer ln.Close()

	type res struct {
		r   *Receiver
		err error
	}
	ch := make(chan res, 1)
	go func() {
		r, err := ln.Accept(t.Context())
		ch <- res{r, err}
	}()

	// Strangers do not end the wait, and one that says nothing holds up
	// nobody.
	silent, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer silent.Close()
	closed, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	closed.Close()
	require.ErrorIs(t, <-refused, ErrTruncated, "connect and close")
	garbage, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	_, _ = garbage.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 10))
	require.ErrorIs(t, <-refused, ErrTooLarge, "a garbled hello")
	garbage.Close()
	stranger := scfg
	stranger.Key = []byte("a stranger's key, long enough...")
	_, err = Dial(t.Context(), ln.Addr().String(), stranger)
	require.ErrorIs(t, err, ErrAuth)
	require.ErrorIs(t, <-refused, ErrAuth)

	s, err := Dial(t.Context(), ln.Addr().String(), scfg)
	require.NoError(t, err)
	got := <-ch
	require.NoError(t, got.err)
	assert.Equal(t, testIdentity(), got.r.Peer())

	// A second sender while the first is served is refused as busy.
	_, err = Dial(t.Context(), ln.Addr().String(), scfg)
	require.ErrorIs(t, err, ErrBusy)
	require.ErrorIs(t, <-refused, ErrBusy)

	run := runReceiver(t, got.r)
	require.NoError(t, sendCheckpoint(s, 1, KindFinal, 100, []byte("state")))
	require.NoError(t, s.WaitAck(t.Context(), 1))
	require.NoError(t, s.Handover())
	require.NoError(t, waitErr(t, run))
	assert.True(t, got.r.HandedOver())
	require.NoError(t, s.Close(), "idempotent")
	require.NoError(t, got.r.Close())
}

func TestCheckListenAddr(t *testing.T) {
	tests := []struct {
		addr    string
		haveKey bool
		wantErr error
	}{
		{"127.0.0.1:7000", false, nil},
		{"127.1.2.3:7000", false, nil},
		{"[::1]:7000", false, nil},
		{"localhost:7000", false, nil},
		{":7000", false, ErrInsecureListen},
		{"0.0.0.0:7000", false, ErrInsecureListen},
		{"[::]:7000", false, ErrInsecureListen},
		{"10.0.0.5:7000", false, ErrInsecureListen},
		{"standby.example:7000", false, ErrInsecureListen},
		{":7000", true, nil},
		{"10.0.0.5:7000", true, nil},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s key=%v", tt.addr, tt.haveKey), func(t *testing.T) {
			err := CheckListenAddr(tt.addr, tt.haveKey)
			if tt.wantErr == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, tt.wantErr)
			}
		})
	}
	require.Error(t, CheckListenAddr("no-port", true))
}

func TestLoadKey(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    string
		wantErr bool
	}{
		{"good", "0123456789abcdef0123456789abcdef", 0o600, "0123456789abcdef0123456789abcdef", false},
		{"trailing newline trimmed", "0123456789abcdef0123456789abcdef\n", 0o400, "0123456789abcdef0123456789abcdef", false},
		{"binary key kept whole", "\x00\xff0123456789abcdef0123456789ab \n", 0o600, "\x00\xff0123456789abcdef0123456789ab \n", false},
		{"world readable", "0123456789abcdef0123456789abcdef", 0o644, "", true},
		{"group readable", "0123456789abcdef0123456789abcdef", 0o640, "", true},
		{"empty", "", 0o600, "", true},
		{"only a newline", "\n", 0o600, "", true},
		{"short", "0123456789", 0o600, "", true},
		{"too long", string(make([]byte, MaxKeyLen+1)), 0o600, "", true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprint(i))
			require.NoError(t, os.WriteFile(p, []byte(tt.content), tt.mode))
			require.NoError(t, os.Chmod(p, tt.mode))
			k, err := LoadKey(p)
			if tt.wantErr {
				require.ErrorIs(t, err, ErrKey)
				t.Logf("%v", err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(k))
		})
	}
	_, err := LoadKey(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}
