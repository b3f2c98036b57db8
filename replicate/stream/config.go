package stream

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Defaults for the zero values in Config.
const (
	DefaultHeartbeatInterval = 100 * time.Millisecond
	DefaultFailoverTimeout   = time.Second
	DefaultHandshakeTimeout  = 10 * time.Second
)

// Config configures either end of a stream. Fields marked "sender" or
// "receiver" are ignored on the other end.
type Config struct {
	// Key is the pre-shared key (see LoadKey). Both ends must hold the
	// same one.
	Key []byte
	// Insecure allows a stream without a key, for loopback use only: the
	// frames are still sealed (AES-GCM), but under keys anyone can derive,
	// so that only catches corruption. Both ends must agree; a keyed end
	// refuses an unkeyed peer.
	Insecure bool

	// Identity is, on the sender, the VM being streamed (required); on the
	// receiver, the VM it expects, or zero to accept any (the lead then
	// checks Receiver.Peer itself).
	Identity Identity

	// HeartbeatInterval is how often each end sends a heartbeat.
	HeartbeatInterval time.Duration
	// FailoverTimeout is how long an end waits without receiving any frame
	// before it declares the peer lost (ErrTimeout). At least twice
	// HeartbeatInterval.
	FailoverTimeout time.Duration
	// HandshakeTimeout bounds the handshake (real time).
	HandshakeTimeout time.Duration
	// Clock drives heartbeats and the failure detector; nil means the
	// system clock.
	Clock Clock
	// Logger; nil means slog.Default().
	Logger *slog.Logger

	// OnFailure, if set, is called once, on its own goroutine, when the
	// stream fails for any reason other than a local Close or a clean
	// goodbye: this is the failure detector's output.
	OnFailure func(err error)

	// OnAck (sender), if set, is called for each acknowledged epoch, in
	// order, on the stream's reading goroutine; it must not block.
	OnAck func(epoch uint64)

	// Sink (receiver) stages the pages of each checkpoint; nil means a
	// new MemSink.
	Sink PageSink
	// OnCommit (receiver), if set, is called with each verified checkpoint
	// before the sink commits and before the ack: returning an error
	// refuses the checkpoint (ErrCommit), which is then aborted.
	OnCommit func(c *Checkpoint) error
}

// ErrConfig is wrapped by configuration errors.
var ErrConfig = errors.New("invalid stream config")

func (c Config) withDefaults() (Config, error) {
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.FailoverTimeout == 0 {
		c.FailoverTimeout = max(DefaultFailoverTimeout, 2*c.HeartbeatInterval)
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	switch {
	case c.HeartbeatInterval < 0 || c.FailoverTimeout < 2*c.HeartbeatInterval:
		return c, fmt.Errorf("%w: failover timeout %v must be at least twice the heartbeat interval %v",
			ErrConfig, c.FailoverTimeout, c.HeartbeatInterval)
	case len(c.Key) == 0 && !c.Insecure:
		return c, fmt.Errorf("%w: no key (give --key-file, or Insecure for loopback use)", ErrConfig)
	case len(c.Key) > 0 && c.Insecure:
		return c, fmt.Errorf("%w: both a key and Insecure", ErrConfig)
	case len(c.Key) > 0 && (len(c.Key) < MinKeyLen || len(c.Key) > MaxKeyLen):
		return c, fmt.Errorf("%w: key of %d bytes, want %d..%d", ErrConfig, len(c.Key), MinKeyLen, MaxKeyLen)
	}
	return c, nil
}
