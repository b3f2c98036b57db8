package netback

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// Published ports: host TCP ports relayed to the guest.

func TestUserPublishHTTP(t *testing.T) {
	u, g := newUserWithGuest(t, UserConfig{Publish: []Publish{{GuestPort: 80}}})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s", r.Host)
	})}
	l, err := gonet.ListenTCP(g.st, tcpip.FullAddress{NIC: nicID, Port: 80}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	addr := u.PublishedAddrs()[0].String()
	require.True(t, strings.HasPrefix(addr, "127.0.0.1:"), addr)
	client := noProxyClient()
	defer client.CloseIdleConnections()
	for range 3 { // several connections, one after another
		resp, err := client.Get("http://" + addr + "/healthz")
		require.NoError(t, err)
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		assert.Equal(t, "hello from "+addr, string(b))
	}
}

// A client that connects before the guest's driver is up waits in the
// host's listen queue and is relayed once it is: no frame of its
// connection reaches a guest that would drop it (whose SYN netstack would
// send again only a second later).
func TestUserPublishWaitsForGuestReady(t *testing.T) {
	var up atomic.Bool
	var refused atomic.Int32
	u, g := newGuestUser(t, UserConfig{Publish: []Publish{{GuestPort: 7}}}, func() bool {
		ok := up.Load()
		if !ok {
			refused.Add(1)
		}
		return ok
	})
	var accepted atomic.Int32
	g.serve(t, 7, func(c net.Conn) {
		accepted.Add(1)
		echoUpper(c)
	})
	c, err := net.Dial("tcp", u.PublishedAddrs()[0].String())
	require.NoError(t, err, "the host port listens before the guest is ready")
	defer c.Close()
	_, err = c.Write([]byte("early"))
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())

	time.Sleep(300 * time.Millisecond) // time enough to relay, were it allowed
	assert.Zero(t, refused.Load(), "frames sent to a guest that is not ready")
	assert.Zero(t, accepted.Load(), "connection relayed before the guest was ready")

	up.Store(true)
	u.GuestReady()
	u.GuestReady() // idempotent
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "EARLY", string(b))
	assert.Equal(t, int32(1), accepted.Load())
	assert.Zero(t, refused.Load())
}

func TestUserPublishHalfClose(t *testing.T) {
	u, g := newUserWithGuest(t, UserConfig{Publish: []Publish{{GuestPort: 7}}})
	g.serve(t, 7, echoUpper)

	c, err := net.Dial("tcp", u.PublishedAddrs()[0].String())
	require.NoError(t, err)
	defer c.Close()
	payload := strings.Repeat("abc", 100_000) // several windows' worth
	_, err = c.Write([]byte(payload))
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, strings.ToUpper(payload), string(b))
}

func TestUserPublishGuestNotListening(t *testing.T) {
	u, _ := newUserWithGuest(t, UserConfig{Publish: []Publish{{GuestPort: 81}}})
	c, err := net.Dial("tcp", u.PublishedAddrs()[0].String())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
	n, err := c.Read(make([]byte, 1))
	assert.Zero(t, n)
	assert.ErrorIs(t, err, io.EOF, "the host client sees its connection closed")
}

func TestUserPublishPortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := uint16(l.Addr().(*net.TCPAddr).Port)

	u, err := NewUser(UserConfig{Publish: []Publish{{GuestPort: 80}, {HostPort: port, GuestPort: 80}}, Logger: testLogger(t)})
	assert.Nil(t, u)
	require.EqualError(t, err, "publish 127.0.0.1:"+strconv.Itoa(int(port))+": address already in use")

	// The first listener was released on failure: its port can be taken again.
	u, err = NewUser(UserConfig{Publish: []Publish{{HostAddr: "127.0.0.1", HostPort: 0, GuestPort: 80}}, Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, u.Close())
}
