package witness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"govmm/replicate/stream"
)

// Config parameterises a Client.
type Config struct {
	// Addr is the witness, HOST:PORT.
	Addr string
	// Key is the pre-shared key (stream.LoadKey, the same --key-file as
	// the replication stream). Required: an unauthenticated witness would
	// let anyone fence a primary or grant a standby the VM.
	Key []byte
	// VM names the protected VM at the witness (the VMM's --name).
	VM string
	// Holder says who this VMM is, for the witness's record and logs
	// (e.g. "primary host-a:7000"). The client appends a random suffix so
	// that two processes never share a name.
	Holder string
	// Lease is the lease asked for (default DefaultLease); the witness
	// may grant less (its --max-lease) or more (MinLease).
	Lease time.Duration
	// Margin: the holder stops releasing this long before the witness's
	// earliest expiry, on top of the clock-drift allowance (default a
	// tenth of the granted lease; at most half of it).
	Margin time.Duration
	// RequestTimeout bounds one request, dial and handshake included, in
	// real time (default a quarter lease, at most 2s, at least 50ms).
	RequestTimeout time.Duration
	// Clock is the lease clock (default BootClock).
	Clock  Clock
	Logger *slog.Logger
}

// Client talks to one witness about one VM over one connection, dialed on
// first use and again after any error. Requests are serialized (one in
// flight); it is safe for concurrent use. A Client makes at most one
// Lease (its holder name is that lease's, and the witness counts a second
// acquire by the same holder as a retry of the first); a Client whose
// lease was fenced refuses to acquire or claim again: a fenced VMM must
// stop.
type Client struct {
	cfg    Config
	clk    Clock
	log    *slog.Logger
	holder string
	fenced atomic.Bool
	leased atomic.Uint64 // the generation of the one Lease this client made

	mu     sync.Mutex // guards conn, nextID, closed; held for a whole request
	conn   *conn
	nextID uint64
	closed bool
}

// NewClient checks cfg; it does not touch the network.
func NewClient(cfg Config) (*Client, error) {
	if _, port, err := net.SplitHostPort(cfg.Addr); err != nil || port == "" {
		return nil, fmt.Errorf("witness address %q: want HOST:PORT", cfg.Addr)
	}
	if len(cfg.Key) < stream.MinKeyLen {
		return nil, fmt.Errorf("witness %s: a key of at least %d bytes is required (--key-file)", cfg.Addr, stream.MinKeyLen)
	}
	if err := checkName("vm name", cfg.VM); err != nil {
		return nil, fmt.Errorf("witness %s: %w", cfg.Addr, err)
	}
	if cfg.Holder == "" {
		cfg.Holder = "govmm"
	}
	const suffix = 18 // " #" + 16 hex digits
	if err := checkName("holder", cfg.Holder); err != nil || len(cfg.Holder) > MaxName-suffix {
		return nil, fmt.Errorf("witness %s: holder %q: want 1..%d printable bytes", cfg.Addr, cfg.Holder, MaxName-suffix)
	}
	if cfg.Lease == 0 {
		cfg.Lease = DefaultLease
	}
	if err := CheckLease(cfg.Lease); err != nil {
		return nil, fmt.Errorf("witness %s: lease %v: %w", cfg.Addr, cfg.Lease, err)
	}
	if cfg.Margin < 0 || cfg.Margin >= cfg.Lease/2 {
		return nil, fmt.Errorf("witness %s: margin %v: want less than half the lease (%v)", cfg.Addr, cfg.Margin, cfg.Lease)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = min(max(cfg.Lease/4, 50*time.Millisecond), 2*time.Second)
	}
	if cfg.Clock == nil {
		cfg.Clock = BootClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	// The witness takes two requests from the same holder name for one
	// VMM's (a retry); 64 random bits keep two VMMs from sharing one.
	var r [8]byte
	_, _ = rand.Read(r[:])
	c := &Client{cfg: cfg, clk: cfg.Clock, holder: cfg.Holder + " #" + hex.EncodeToString(r[:])}
	c.log = cfg.Logger.With("component", "witness", "witness", cfg.Addr)
	return c, nil
}

// Holder is this client's name at the witness (Config.Holder and a
// random suffix).
func (c *Client) Holder() string { return c.holder }

// Addr is the witness's address (Config.Addr).
func (c *Client) Addr() string { return c.cfg.Addr }

// VM is the VM's name at the witness (Config.VM).
func (c *Client) VM() string { return c.cfg.VM }

// LeaseAsked is the lease this client asks for (Config.Lease, defaulted).
func (c *Client) LeaseAsked() time.Duration { return c.cfg.Lease }

// ErrClosed is returned by requests on a closed Client.
var ErrClosed = errors.New("witness client closed")

// Close drops the connection for good: later requests fail with
// ErrClosed, so a Lease of this client stops being renewed and runs out
// (close it first). Idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.conn != nil {
		err := c.conn.close()
		c.conn = nil
		return err
	}
	return nil
}

func (c *Client) retryEvery() time.Duration { return max(c.cfg.Lease/8, 5*time.Millisecond) }

// do sends one request and reads its reply. sent is the lease clock
// reading taken just before the request was written: the witness receives
// it later, so a lease counted from sent on the holder's side ends before
// the one the witness counts from its receipt.
func (c *Client) do(ctx context.Context, q *request) (sent time.Duration, rep reply, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer func() {
		if err != nil {
			if c.conn != nil {
				c.conn.close()
				c.conn = nil
			}
			err = fmt.Errorf("witness %s: %v %s: %w", c.cfg.Addr, q.op, q.vm, err)
		}
	}()
	deadline := time.Now().Add(c.cfg.RequestTimeout)
	callerBound := false // the caller's deadline, not RequestTimeout, bounds this attempt
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline, callerBound = d, true
	}
	defer func() {
		// A socket deadline that is the caller's can fire a moment before
		// ctx says it is done: the error is still the caller's deadline.
		if callerBound && errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
		}
	}()
	if err := ctx.Err(); err != nil {
		return 0, reply{}, err
	}
	if c.closed {
		return 0, reply{}, ErrClosed
	}
	if c.conn == nil {
		d := net.Dialer{Deadline: deadline}
		nc, err := d.DialContext(ctx, "tcp", c.cfg.Addr)
		if err != nil {
			return 0, reply{}, err
		}
		c.conn = newConn(nc)
		stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
		_ = nc.SetDeadline(deadline)
		err = c.conn.clientHandshake(c.cfg.Key)
		if !stop() && err == nil {
			err = ctx.Err()
		}
		if err != nil {
			return 0, reply{}, fmt.Errorf("handshake: %w", err)
		}
	}
	nc := c.conn.nc
	_ = nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c.nextID++
	q.id = c.nextID
	buf := appendRequest(make([]byte, 0, requestFixed+4+len(q.vm)+len(q.holder)), q)
	sent = c.clk.Now()
	if err := c.conn.write(frameRequest, buf); err != nil {
		return 0, reply{}, err
	}
	t, p, err := c.conn.read()
	if err != nil {
		if ctx.Err() != nil {
			return 0, reply{}, fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		return 0, reply{}, err
	}
	switch t {
	case frameReply:
	case frameError:
		return 0, reply{}, peerRefusal(p)
	default:
		return 0, reply{}, fmt.Errorf("got %v frame, want reply: %w", t, ErrProtocol)
	}
	if rep, err = parseReply(p); err != nil {
		return 0, reply{}, err
	}
	if rep.id != q.id {
		return 0, reply{}, fmt.Errorf("reply to request %d, want %d: %w", rep.id, q.id, ErrProtocol)
	}
	_ = nc.SetDeadline(time.Time{})
	return sent, rep, nil
}

func recordOf(vm string, rep *reply) Record {
	return Record{VM: vm, Generation: rep.gen, Holder: rep.holder, Lease: rep.lease, Remaining: rep.remaining, Renewals: rep.renewals}
}

// refusal turns a negative reply into a *Refusal.
func (c *Client) refusal(opName string, rep *reply) error {
	r := &Refusal{Addr: c.cfg.Addr, Op: opName, Record: recordOf(c.cfg.VM, rep), Message: rep.message}
	switch rep.result {
	case resultHeld:
		r.Reason = ErrHeld
	case resultSuperseded:
		r.Reason = ErrSuperseded
	case resultUnknown:
		r.Reason = ErrUnknownVM
	case resultOK:
		r.Reason = fmt.Errorf("unexpected answer: generation %d held by %q: %w", rep.gen, rep.holder, ErrProtocol)
	default:
		r.Reason = ErrRefused
	}
	return r
}

// Query asks the witness for the VM's record. A VM it does not know is a
// *Refusal wrapping ErrUnknownVM.
func (c *Client) Query(ctx context.Context) (Record, error) {
	_, rep, err := c.do(ctx, &request{op: opStatus, vm: c.cfg.VM})
	if err != nil {
		return Record{}, err
	}
	if rep.result != resultOK {
		return recordOf(c.cfg.VM, &rep), c.refusal("status", &rep)
	}
	return recordOf(c.cfg.VM, &rep), nil
}

// Acquire takes a new generation of the VM for a primary starting
// protection: the witness grants current+1 once no other VMM's lease is
// valid. While one is, Acquire waits for it to run out, and gives up with
// ErrHolderAlive as soon as its holder renews (the VM runs elsewhere).
// Network errors are retried until ctx ends; the error then names the
// last one, so that a witness unreachable at start is a clear error.
func (c *Client) Acquire(ctx context.Context) (*Lease, error) {
	return c.acquire(ctx, "acquire", &request{op: opAcquire, vm: c.cfg.VM, holder: c.holder, lease: c.cfg.Lease})
}

// Claim takes generation base+1 for a standby whose replica descends from
// generation base (the primary's, as carried by the replication stream).
// The witness grants it only if base is still current and its holder's
// lease has run out there, which happens only after the old primary has
// stopped releasing output by its own clock. While the lease is valid,
// Claim waits for it (polling at least every quarter lease); if the
// holder renews meanwhile, Claim fails with ErrHolderAlive (the primary
// is alive and reaches the witness: do not take over). A newer generation
// than base is ErrSuperseded (someone else won, or the primary moved on
// without this standby). Network errors are retried until ctx ends.
func (c *Client) Claim(ctx context.Context, base uint64) (*Lease, error) {
	if base == 0 {
		return nil, fmt.Errorf("witness %s: claim %s: base generation 0 (the primary never held one)", c.cfg.Addr, c.cfg.VM)
	}
	return c.acquire(ctx, "claim", &request{op: opAcquire, base: true, gen: base, vm: c.cfg.VM, holder: c.holder, lease: c.cfg.Lease})
}

func (c *Client) acquire(ctx context.Context, opName string, q *request) (*Lease, error) {
	var (
		last          error
		seen          bool
		prevGen, prev uint64
	)
	for {
		if c.fenced.Load() {
			return nil, fmt.Errorf("witness %s: %s %s: this VMM was fenced: %w", c.cfg.Addr, opName, c.cfg.VM, ErrFenced)
		}
		if g := c.leased.Load(); g != 0 {
			return nil, fmt.Errorf("witness %s: %s %s: this client already holds generation %d (one lease per client)", c.cfg.Addr, opName, c.cfg.VM, g)
		}
		wait := c.retryEvery()
		sent, rep, err := c.do(ctx, q)
		switch {
		case err != nil && (permanent(err) || errors.Is(err, ErrClosed)):
			return nil, err
		case err != nil:
			// An attempt cut short by the caller's own deadline says
			// nothing new: keep what the one before found (a refusal).
			if last == nil || (ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded)) {
				last = err
			}
		case rep.result == resultOK && rep.holder == c.holder && (!q.base || rep.gen == q.gen+1):
			core := newLeaseCore(c.cfg.VM, c.holder, rep.gen)
			margin := defaultMargin(rep.lease)
			if c.cfg.Margin > 0 {
				margin = min(c.cfg.Margin, rep.lease/2)
			}
			core.grant(sent, rep.lease, margin)
			c.leased.Store(rep.gen)
			c.log.Info("witness granted generation", "vm", c.cfg.VM, "generation", rep.gen, "holder", c.holder, "lease", rep.lease)
			return newLease(c, core, sent), nil
		case rep.result == resultHeld:
			if seen && rep.gen == prevGen && rep.renewals > prev {
				return nil, &Refusal{Addr: c.cfg.Addr, Op: opName, Reason: ErrHolderAlive, Record: recordOf(c.cfg.VM, &rep)}
			}
			seen, prevGen, prev = true, rep.gen, rep.renewals
			last = c.refusal(opName, &rep)
			// Ask again when the lease should have run out, or sooner to
			// notice a renewal.
			wait = min(rep.remaining, rep.lease/4) + time.Millisecond
		case rep.result == resultError:
			last = c.refusal(opName, &rep) // perhaps transient (state not saved): retry
		default:
			return nil, c.refusal(opName, &rep)
		}
		if !sleep(c.clk, wait, ctx.Done()) {
			var ref *Refusal
			if errors.As(last, &ref) {
				return nil, last
			}
			return nil, fmt.Errorf("witness %s: %s %s: gave up (%w); last error: %w", c.cfg.Addr, opName, c.cfg.VM, ctx.Err(), last)
		}
	}
}

// permanent reports errors that asking again cannot cure: a wrong key, a
// peer that is not a witness of this version.
func permanent(err error) bool {
	return errors.Is(err, ErrAuth) || errors.Is(err, ErrVersion) || errors.Is(err, ErrProtocol)
}
