package witness

import (
	"context"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// countingConn counts the bytes a witness connection carries.
type countingConn struct {
	net.Conn
	in, out *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.in.Add(int64(n))
	return n, err
}

func (c countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.Add(int64(n))
	return n, err
}

type countingListener struct {
	net.Listener
	in, out atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, &l.in, &l.out}, nil
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRenew measures one lease renewal over loopback TCP, witness
// and client in this process: its CPU time (both ends, kernel included)
// and its bytes on the wire (TCP payload: both frames, sealed). A primary
// renews every quarter lease: 2 a second with DefaultLease.
func BenchmarkRenew(b *testing.B) {
	srv, err := NewServer(ServerConfig{Key: testKey, StateDir: b.TempDir(), Logger: (&logBuf{}).logger()})
	require.NoError(b, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	cl := &countingListener{Listener: ln}
	go srv.Serve(cl)
	defer srv.Close()
	c, err := NewClient(Config{Addr: ln.Addr().String(), Key: testKey, VM: "vm0", Holder: "primary host-a:7000", Logger: (&logBuf{}).logger()})
	require.NoError(b, err)
	defer c.Close()
	l, err := c.Acquire(context.Background())
	require.NoError(b, err)
	l.Close() // renew by hand below
	ctx := context.Background()
	q := request{op: opRenew, gen: l.Generation(), vm: "vm0", holder: c.Holder()}
	_, _, err = c.do(ctx, &q)
	require.NoError(b, err)
	in0, out0 := cl.in.Load(), cl.out.Load()
	cpu0 := cpuTime()
	b.ResetTimer()
	for range b.N {
		_, rep, err := c.do(ctx, &q)
		if err != nil || rep.result != resultOK {
			b.Fatal(err, rep.result)
		}
	}
	b.StopTimer()
	cpu := cpuTime() - cpu0
	bytes := float64(cl.in.Load()-in0+cl.out.Load()-out0) / float64(b.N)
	perSecond := float64(time.Second) / float64(DefaultLease/4)
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/renewal")
	b.ReportMetric(bytes, "B/renewal")
	b.ReportMetric(bytes*perSecond, "B/s@2s-lease")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)*perSecond/1e3, "cpu-µs/s@2s-lease")
}

// BenchmarkCanRelease is the release path's check: a CLOCK_BOOTTIME
// reading and three atomic loads.
func BenchmarkCanRelease(b *testing.B) {
	c, err := NewClient(Config{Addr: "127.0.0.1:1", Key: testKey, VM: "vm0", Holder: "primary"})
	require.NoError(b, err)
	core := newLeaseCore("vm0", c.holder, 1)
	core.grant(BootClock{}.Now(), time.Hour, 0)
	l := &Lease{c: c, core: core}
	b.ResetTimer()
	for range b.N {
		if !l.CanRelease() {
			b.Fatal("lease not valid")
		}
	}
}
