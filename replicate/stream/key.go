package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
)

// Key length limits. 16 bytes is the least that makes HMAC-SHA256 worth
// having; 32 random bytes (head -c 32 /dev/urandom) is what we recommend.
const (
	MinKeyLen = 16
	MaxKeyLen = 4096
)

// ErrKey is wrapped by every LoadKey refusal.
var ErrKey = errors.New("unusable key file")

// LoadKey reads a pre-shared key from path (the --key-file flag). It refuses
// a file that anyone but its owner may read or write, an empty or short key
// (fewer than MinKeyLen bytes) and an oversized one. A text key (printable
// ASCII and whitespace only) loses its trailing whitespace, so that a key
// written by `echo` or an editor means the same on both hosts; a binary key
// (any other byte, as in the 32 random bytes we recommend) is used whole,
// its last bytes included even where they happen to be 0x0a or 0x20.
func LoadKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("key file %s: not a regular file: %w", path, ErrKey)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("key file %s: mode %04o lets others read it (chmod 600): %w", path, perm, ErrKey)
	}
	if st.Size() > MaxKeyLen+64 {
		return nil, fmt.Errorf("key file %s: %d bytes, at most %d: %w", path, st.Size(), MaxKeyLen, ErrKey)
	}
	buf, err := io.ReadAll(io.LimitReader(f, MaxKeyLen+65))
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	key := buf
	if isText(buf) {
		key = bytes.TrimRight(buf, " \t\r\n")
	}
	switch {
	case len(key) == 0:
		return nil, fmt.Errorf("key file %s: empty: %w", path, ErrKey)
	case len(key) < MinKeyLen:
		return nil, fmt.Errorf("key file %s: %d bytes, need at least %d: %w", path, len(key), MinKeyLen, ErrKey)
	case len(key) > MaxKeyLen:
		return nil, fmt.Errorf("key file %s: %d bytes, at most %d: %w", path, len(key), MaxKeyLen, ErrKey)
	}
	return bytes.Clone(key), nil
}

// isText says whether b holds only printable ASCII and whitespace: a key
// someone typed or echoed, not random bytes.
func isText(b []byte) bool {
	for _, c := range b {
		if (c < 0x20 || c > 0x7e) && c != '\t' && c != '\r' && c != '\n' {
			return false
		}
	}
	return true
}

// ErrInsecureListen is returned by CheckListenAddr.
var ErrInsecureListen = errors.New("without a key, the stream uses only loopback addresses")

// CheckListenAddr enforces where a receiver may listen. With a key, any
// address is fine. Without one (Config.Insecure), only a loopback address:
// 127.0.0.0/8, ::1 or "localhost". An empty host ("", ":7000") means every
// interface and is refused, as is any other host name, since what it
// resolves to can change.
func CheckListenAddr(addr string, haveKey bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", addr, err)
	}
	if haveKey {
		return nil
	}
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	if host == "" {
		return fmt.Errorf("%w (an empty host is every interface)", ErrInsecureListen)
	}
	return fmt.Errorf("%w (%s is not one)", ErrInsecureListen, host)
}
